"""A model fitted in process to a few token rows until it recites them: what the scoring tests need to know the
answer a model gives (test_eval, test_eval_paths)."""

from __future__ import annotations

import torch

from models.gpt import GPT


def fit_rows(model: GPT, rows: list[list[int]], steps: int, stop_below: float) -> float:
    """Train `model` on every row's next tokens (rows padded at the end, the padding not scored) with AdamW at
    1e-2, for at most `steps` full-batch steps or until the loss falls under `stop_below`; returns the last loss
    and leaves the model in eval mode."""
    width = max(len(r) for r in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r) - 1] = torch.tensor(r[:-1])
        y[i, : len(r) - 1] = torch.tensor(r[1:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < stop_below:
            break
    model.eval()
    return loss.item()
