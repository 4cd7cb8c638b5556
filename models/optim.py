"""Muon for the hidden weight matrices, AdamW for everything else, stepped and checkpointed as one optimizer.

Muon (Jordan et al. 2024) orthogonalises each matrix's momentum with a few Newton-Schulz iterations before the
update, which speedrun recipes found to reach a given loss in fewer steps than AdamW. It is meant for 2-D weights
inside the blocks only: embeddings, the output head, norms and biases stay on AdamW. The update is scaled by
0.2 * sqrt(max(rows, cols)) to AdamW's RMS (Liu et al. 2025, torch's `adjust_lr_fn="match_rms_adamw"`), so both
parts share one learning rate and the stage's schedule drives them alike.

Why not `torch.optim.Muon` itself: it always iterates in bf16, and on a CPU without bf16 matrix units that is
~20x slower than fp32 (a 384x128 iteration: 96 ms against 4.5 ms on this 2-core machine), which made a CPU run's
steps several times slower. `Muon` here is the same update, iterating in bf16 on GPU and in fp32 elsewhere; in bf16
it equals `torch.optim.Muon` (tested).

The training loop only needs `param_groups` (it sets each group's lr), `step`, `zero_grad`, and a state dict in
torch's layout (integer parameter ids, `state` and `param_groups`), which `tasks/train_state.py` writes to
safetensors for AdamW already; the two parts' ids are numbered one after the other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

# The quintic Newton-Schulz coefficients of Jordan et al. (also torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal matrix with `g`'s singular vectors (singular values near 1), by `steps`
    Newton-Schulz iterations in `dtype` (default: bf16 on GPU, fp32 elsewhere). `g` is one matrix (rows, cols) or
    a stack of same-shape matrices (n, rows, cols), each orthogonalised on its own in one batched product."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype or (torch.bfloat16 if g.is_cuda else torch.float32))
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    if x.dim() == 2:
        x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:
        x = x / torch.linalg.matrix_norm(x).clamp(min=eps).view(-1, 1, 1)  # each matrix by its Frobenius norm
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, orthogonalised, scaled to AdamW's RMS, decoupled weight decay."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: torch.dtype | None = None):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "nesterov": nesterov, "ns_steps": ns_steps})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            same_shape: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D weights only, not a tensor of shape {tuple(p.shape)}")
                same_shape.setdefault((p.shape, p.dtype, p.device), []).append(p)
            # one batched Newton-Schulz per shape (the 4-layer shakespeare model's 20 matrices: 19 -> 14 ms on CPU)
            for params in same_shape.values():
                grads = [p.grad for p in params]
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - mu)
                updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
                if len(params) == 1:
                    ortho = [orthogonalize(updates[0], group["ns_steps"], self.ns_dtype)]
                else:
                    ortho = list(orthogonalize(torch.stack(updates), group["ns_steps"], self.ns_dtype).unbind(0))
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
                torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(ortho, params, strict=True)],
                                    alpha=-lr * 0.2 * math.sqrt(max(params[0].shape)))


class MuonAdamW:
    def __init__(self, matrices: Iterable[torch.Tensor], others: list[dict[str, Any]], lr: float, weight_decay: float,
                 betas: tuple[float, float], momentum: float = 0.95, ns_dtype: torch.dtype | None = None):
        self.adamw = torch.optim.AdamW(others, lr=lr, betas=betas, foreach=True)
        self.muon = Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, ns_dtype=ns_dtype)
        self.parts = (self.adamw, self.muon)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.parts for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.parts:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for opt in self.parts:
            sd = opt.state_dict()
            state |= {i + offset: s for i, s in sd["state"].items()}
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        groups = list(sd["param_groups"])
        offset = 0
        for opt in self.parts:
            mine, groups = groups[: len(opt.param_groups)], groups[len(opt.param_groups) :]
            n = sum(len(g["params"]) for g in mine)
            opt.load_state_dict({
                "state": {int(i) - offset: s for i, s in sd["state"].items() if offset <= int(i) < offset + n},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine],
            })
            offset += n
