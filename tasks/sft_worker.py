"""What SFT adds to the shared Ray Train worker loop (`tasks/train_worker.py`): the base model's weights as the
start, with the document mask on, and batches of packed (or padded) windows weighted per assistant token.

Data order: the windows of step s on rank r are a function of (seed, s, r) through one permutation per epoch,
so every window is seen once per epoch and a resumed run draws exactly what the killed one would have drawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.lora import LoraOptions
from tasks.chat import IGNORE
from tasks.packing import Windows, batch
from tasks.refs import RunLink
from tasks.sft import SFTConfig
from tasks.train_worker import Worker, run_loop, setup_worker


def base_model(base: Path, eot_id: int, device: torch.device, lora: LoraOptions | None = None) -> torch.nn.Module:
    """The base model on `device`, its document mask on so that packed conversations stay apart (the saved
    model keeps the base's own setting), with LoRA adapters injected when asked: then only the adapters
    require grad, so the optimizer (made from trainable parameters) holds nothing for the frozen weights."""
    from models.checkpoint import load_model
    from models.gpt import _eager_doc_block_mask

    model = load_model(base, device)
    model.config = model.config.model_copy(update={"doc_mask": True, "eot_id": eot_id})
    if model.config.flex_attention:
        _eager_doc_block_mask()  # as GPT.__init__ does: wrapped before any torch.compile traces the model
    if lora is not None:
        from models.lora import add_lora

        model = add_lora(model, lora)
    return model


class SFTBatches:
    """Micro-batches of windows, each weighted by its share of the optimizer step's assistant tokens."""

    def __init__(self, folder: Path):
        self.train, self.val = Windows.load(folder / "train"), Windows.load(folder / "val")
        self.n = len(self.train.lengths)
        self._perms: dict[int, np.ndarray] = {}

    def _row(self, g: int, seed: int) -> int:
        """The g-th window drawn over the whole run: epoch g // n, shuffled by (seed, epoch)."""
        epoch = g // self.n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([seed, epoch]).permutation(self.n)}
        return int(self._perms[epoch][g % self.n])

    def step_rows(self, seed: int, step: int, rank: int, world: int, accum: int, B: int) -> list[np.ndarray]:
        """The windows of each of rank `rank`'s micro-batches in step `step`."""
        first = (step * world + rank) * accum * B  # this rank's first draw in step `step`
        return [np.array([self._row(first + m * B + i, seed) for i in range(B)]) for m in range(accum)]

    def micro_batches(self, w: Worker, step: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        xy = [tuple(torch.from_numpy(a) for a in batch(self.train, rows))
              for rows in self.step_rows(w.cfg.seed, step, w.rank, w.world, w.accum, w.cfg.batch_size)]
        local = [int((y != IGNORE).sum()) for _, y in xy]
        total = torch.tensor(float(sum(local)), device=w.device)
        if w.world > 1:
            torch.distributed.all_reduce(total)  # assistant tokens in the whole step, over every rank
        # a micro-batch's mean loss times k / total is its share of the step's per-token loss; times world because
        # DDP and FSDP average the ranks' gradients
        return [(x, y, k * w.world / max(total.item(), 1.0)) for (x, y), k in zip(xy, local, strict=True)]

    def evaluate(self, w: Worker) -> dict[str, float]:
        """Loss per assistant token over every validation window; each rank takes every world-th window, and all
        ranks run the same number of forwards (DDP and FSDP forwards are collective)."""
        mine = np.arange(w.rank, len(self.val.lengths), w.world)
        n_batches = math.ceil(math.ceil(len(self.val.lengths) / w.world) / w.cfg.batch_size)
        sums = torch.zeros(2, dtype=torch.float64, device=w.device)  # (loss sum, assistant tokens)
        w.model.eval()
        with torch.no_grad(), w.amp:
            for j in range(n_batches):
                rows = mine[j * w.cfg.batch_size : (j + 1) * w.cfg.batch_size]
                x, y = (torch.from_numpy(a).to(w.device) for a in batch(self.val, rows if len(rows) else np.array([0])))
                loss = w.model(x, y)[1]
                if len(rows):  # a rank short of windows runs a dummy forward and counts nothing
                    k = int((y != IGNORE).sum())
                    sums += torch.tensor([loss.item() * k, k], dtype=torch.float64, device=w.device)
        w.model.train()
        if w.world > 1:
            torch.distributed.all_reduce(sums)
        return {"val/loss": (sums[0] / sums[1].clamp(min=1)).item()}


def sft_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's function on every SFT worker. `config`: {"cfg": the SFTConfig as JSON, "base": the base model
    folder, "windows": the folder of packed windows, "run": a `RunLink` as a dict, "progress": the driver's
    progress queue}."""
    from models.checkpoint import load_config

    cfg = SFTConfig.model_validate(config["cfg"])
    base, folder = Path(config["base"]), Path(config["windows"])
    data = SFTBatches(folder)
    eot = json.loads((folder / "meta.json").read_text())["eot_id"]  # the id the driver packed the windows with
    saved = load_config(base)
    w = setup_worker(cfg, "sft", lambda device: base_model(base, eot, device, cfg.lora), saved,
                     cfg.accum_steps(saved.block_size))
    run_loop(w, data, RunLink.model_validate(config.get("run") or {}), config.get("progress"), eval_first=True)

