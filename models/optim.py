"""Muon for the hidden weight matrices, AdamW for everything else, stepped and checkpointed as one optimizer.

Muon (Jordan et al. 2024; `torch.optim.Muon`) orthogonalises each matrix's momentum with a few Newton-Schulz
iterations before the update, which speedrun recipes found to reach a given loss in fewer steps than AdamW. It is
meant for 2-D weights inside the blocks only: embeddings, the output head, norms and biases stay on AdamW. With
`adjust_lr_fn="match_rms_adamw"` Muon's update has AdamW's RMS, so both parts share one learning rate and the
stage's schedule drives them alike.

The training loop only needs `param_groups` (it sets each group's lr), `step`, `zero_grad`, and a state dict in
torch's layout (integer parameter ids, `state` and `param_groups`), which `tasks/train_state.py` writes to
safetensors for AdamW already; the two parts' ids are numbered one after the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class MuonAdamW:
    def __init__(self, matrices: Iterable[torch.Tensor], others: list[dict[str, Any]], lr: float, weight_decay: float,
                 betas: tuple[float, float], momentum: float = 0.95):
        self.adamw = torch.optim.AdamW(others, lr=lr, betas=betas, foreach=True)
        self.muon = torch.optim.Muon(list(matrices), lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     adjust_lr_fn="match_rms_adamw")
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
