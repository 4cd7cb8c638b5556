"""Checkpoint files for training: model weights, optimizer state and RNG as safetensors plus a small JSON.

No pickles: the optimizer's tensors are flattened into `optimizer.safetensors` and its plain values into
`train_state.json`, so a checkpoint from an untrusted place cannot run code when it is loaded.

Every file is written whole or not at all (`infra.atomic`), and `train_state.json`, written last, lists the sizes
of the files beside it: it is the checkpoint's completion marker. `usable_checkpoint` skips, with a warning, a
checkpoint that lacks it or whose files do not match it (a crash or a full disk mid-write, a truncated copy),
and resumes from the newest whole one before it instead.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from infra.atomic import atomic_path, write_text

log = logging.getLogger(__name__)
STATE_FILE = "train_state.json"


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
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
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
    with atomic_path(path) as tmp:
        save_file(states, str(tmp))


def load_rng(path: Path) -> None:
    states = load_file(str(path))
    torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch_cuda"])


def write_json(path: Path, obj: Any) -> None:
    write_text(Path(path), json.dumps(obj, indent=1))


# ---------------------------------------------------------------- which checkpoint to resume from


def file_sizes(d: Path) -> dict[str, int]:
    """Name -> size of the files in `d`: what `train_state.json` records, to tell a whole checkpoint later."""
    return {p.name: p.stat().st_size for p in sorted(Path(d).iterdir()) if p.is_file()}


def checkpoint_problem(d: Path, world: int) -> str | None:
    """Why checkpoint folder `d` cannot be resumed by `world` ranks, or None when it is whole: its marker, the
    files the marker lists (at their sizes) and every rank's RNG file must be there."""
    try:
        meta = read_json(d / STATE_FILE)
    except (OSError, ValueError) as e:
        return f"no readable {STATE_FILE} ({type(e).__name__})"
    for name, size in meta.get("files", {}).items():  # checkpoints from before the sizes were recorded: not checked
        path = d / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is {path.stat().st_size if path.is_file() else 'missing'}, not {size} bytes"
    missing = [f"rng_rank{r}.safetensors" for r in range(world) if not (d / f"rng_rank{r}.safetensors").is_file()]
    return f"missing {', '.join(missing)}" if missing else None


def usable_checkpoint(d: Path, world: int) -> Path | None:
    """`d` when it is whole; else the newest whole `checkpoint_<step>` folder beside it with a smaller step
    (logged as a warning), or None (a fresh start) when there is none. Every rank decides the same way."""
    problem = checkpoint_problem(d, world)
    if problem is None:
        return d
    step = _step(d)
    earlier = sorted((p for p in d.parent.glob("checkpoint_*") if p.is_dir() and _step(p) < step), key=_step,
                     reverse=True)
    for prev in earlier:
        if checkpoint_problem(prev, world) is None:
            log.warning("checkpoint %s is incomplete (%s): resuming from %s", d, problem, prev.name)
            return prev
    log.warning("checkpoint %s is incomplete (%s) and no earlier one is whole: starting from scratch", d, problem)
    return None


def _step(d: Path) -> int:
    m = re.search(r"(\d+)$", d.name)
    return int(m.group(1)) if m else -1


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
