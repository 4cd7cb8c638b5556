"""Checkpoint files for training: model weights, optimizer state and RNG as safetensors plus a small JSON.

No pickles: the optimizer's tensors are flattened into `optimizer.safetensors` and its plain values into
`train_state.json`, so a checkpoint from an untrusted place cannot run code when it is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    return save_optimizer_state(opt.state_dict(), path)


def save_optimizer_state(sd: dict[str, Any], path: Path) -> dict[str, Any]:
    """Tensors of an optimizer state dict to `path`; returns the rest (param groups, plain values) for the JSON.

    State keys are parameter indices (`opt.state_dict()`) or names (FSDP's full optimizer state dict).
    """
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for key, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{key}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(key), {})[name] = value
    save_file(tensors, str(path))
    return {"param_groups": sd["param_groups"], "plain_state": plain}


def load_optimizer(opt: torch.optim.Optimizer, path: Path, meta: dict[str, Any]) -> None:
    opt.load_state_dict(load_optimizer_state(path, meta))


def load_optimizer_state(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    def key(k: str) -> int | str:
        return int(k) if k.isdigit() else k

    state: dict[int | str, dict[str, Any]] = {}
    for name, value in load_file(str(path)).items():
        param, field = name.rsplit(".", 1)  # parameter names hold dots; AdamW's field names do not
        state.setdefault(key(param), {})[field] = value
    for param, values in meta["plain_state"].items():
        state.setdefault(key(param), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_rng(path: Path) -> None:
    """This process's torch RNG (CPU, and the current GPU's when CUDA is in use): one file per rank."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(states, str(path))


def load_rng(path: Path) -> None:
    states = load_file(str(path))
    torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch_cuda"])


def write_json(path: Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=1))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
