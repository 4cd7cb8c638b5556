"""Bits per byte of a whole held-out split: every token predicted once, the score a quality recipe reports.

The stage's running validation (`val/bpb` in the loss curve) samples a few random windows; this reads the split
from its first token to its last in non-overlapping windows of the model's context (the last one shorter), sums the
cross-entropy in nats and divides by the split's UTF-8 bytes (`index.json`), so tokenizers of any vocabulary
compare. A token at the start of a window sees less context than it would in a sliding window, which makes the
number slightly pessimistic, and the same for every model of a given context.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.gpt import GPT


@torch.no_grad()
def split_bits_per_byte(model: GPT, shards: Path, split: str = "val", batch: int = 16) -> float:
    index = json.loads((Path(shards) / "index.json").read_text())
    info = index["splits"][split]
    ids = np.concatenate([np.fromfile(Path(shards) / s["file"], dtype=np.dtype(index["dtype"])) for s in info["shards"]])
    ids = torch.from_numpy(ids.astype(np.int64))
    T = model.config.block_size
    full = (len(ids) - 1) // T
    windows = [ids[s : s + T + 1] for s in range(0, full * T, T)]
    batches = [torch.stack(windows[i : i + batch]) for i in range(0, full, batch)]
    if len(ids) - full * T > 1:
        batches.append(ids[None, full * T :])  # the shorter tail
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats = 0.0
    for x in batches:
        x = x.to(device)
        logits, _ = model(x[:, :-1])
        nats += F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum").item()
    model.train(was_training)
    return nats / math.log(2) / info["bytes"]
