"""Bits per byte of a whole held-out split: every token predicted once, the score a quality recipe reports.

The stage's running validation (`val/bpb` in the loss curve) samples a few random windows; this reads the split
from its first token to its last, sums the cross-entropy in nats and divides by the split's UTF-8 bytes
(`index.json`), so tokenizers of any vocabulary compare. Windows of the model's context start every `stride`
tokens and each scores only the tokens the windows before it did not (the last window is moved back to end at the
split's end). With `stride` equal to the context (the default) the windows do not overlap and a token at a
window's start sees no context, which makes the number pessimistic; a smaller stride gives every token at least
`context - stride` tokens before it, for a pass that costs context / stride times as much.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.gpt import GPT


def score_windows(n: int, context: int, stride: int) -> list[tuple[int, int]]:
    """(start, first) for each window over `n` ids: the window reads ids[start : start + context + 1] (fewer
    when n is shorter) and scores its predictions from offset `first` on. Every id but the first is scored once."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), not {stride}")
    windows, done, start = [], 0, 0  # done: the last id scored (id 0 is never predicted)
    while done < n - 1:
        start = max(0, min(start, n - 1 - context))
        windows.append((start, done - start))
        done = min(start + context, n - 1)
        start += stride
    return windows


@torch.no_grad()
def split_bits_per_byte(model: GPT, shards: Path, split: str = "val", batch: int = 16,
                        stride: int | None = None) -> float:
    index = json.loads((Path(shards) / "index.json").read_text())
    info = index["splits"][split]
    ids = np.concatenate([np.fromfile(Path(shards) / s["file"], dtype=np.dtype(index["dtype"])) for s in info["shards"]])
    ids = torch.from_numpy(ids.astype(np.int64))
    T = model.config.block_size
    windows = score_windows(len(ids), T, stride or T)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats = 0.0
    for i in range(0, len(windows), batch):
        group = windows[i : i + batch]
        # every window is T + 1 ids long (score_windows moves the last one back), unless the split is shorter
        x = torch.stack([ids[s : s + T + 1] for s, _ in group]).to(device)
        logits, _ = model(x[:, :-1])
        losses = F.cross_entropy(logits.transpose(1, 2).float(), x[:, 1:], reduction="none")
        first = torch.tensor([f for _, f in group], device=device)
        nats += losses[torch.arange(losses.shape[1], device=device) >= first[:, None]].sum().item()
    model.train(was_training)
    return nats / math.log(2) / info["bytes"]
