"""Save and load a `GPT` as a folder: `model.safetensors` (weights) + `config.json` (the `GPTConfig`).

Safetensors only, never pickles. A tied output head is stored once (as the token embedding) and re-tied on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from infra.atomic import atomic_path, write_text
from models.gpt import GPT, GPTConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TIED_KEY = "lm_head.weight"  # shares storage with wte.weight when config.tie_embeddings
EMBED_KEY = "wte.weight"


def _for_save(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, without the tied duplicate (safetensors refuses shared storage)."""
    if config.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != TIED_KEY}
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_model(model: GPT, out_dir: Path) -> Path:
    """Write out_dir/model.safetensors and out_dir/config.json; returns out_dir."""
    return save_state_dict(model.state_dict(), model.config, out_dir)


def save_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig, out_dir: Path) -> Path:
    """`save_model` for a full state dict gathered from a sharded (FSDP) model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:  # whole or absent: a crash or a full disk leaves no half file
        save_file(_for_save(sd, config), str(tmp), metadata={"format": "pt"})
    write_text(out_dir / CONFIG_FILE, config.model_dump_json(indent=2) + "\n")
    return out_dir


def load_config(model_dir: Path) -> GPTConfig:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"missing model config: {path}")
    try:
        return GPTConfig.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as e:
        raise ValueError(f"malformed model config {path}: {e}") from e


def load_state_dict(model_dir: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(model_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"missing model weights: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"malformed model weights {path}: {e}") from e


def load_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Load the weights saved in `model_dir` into `model` (strict), whatever wraps its layers (LoRA adapters
    saved with it); the tied head gets the embedding's tensor."""
    sd = load_state_dict(model_dir, next(model.parameters()).device)
    if model.config.tie_embeddings and EMBED_KEY in sd:
        sd[TIED_KEY] = sd[EMBED_KEY]
    model.load_state_dict(sd, strict=True)


def load_model(model_dir: Path, device: str | torch.device = "cpu") -> GPT:
    """Rebuild the GPT saved by `save_model` (strict: every tensor must match by name and shape)."""
    config = load_config(model_dir)
    sd = load_state_dict(model_dir, device)
    if config.tie_embeddings and EMBED_KEY in sd:
        sd[TIED_KEY] = sd[EMBED_KEY]
    model = GPT(config).to(device)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights in {Path(model_dir) / WEIGHTS_FILE} do not fit config.json: {e}") from e
    if config.tie_embeddings:  # load_state_dict copies into both names; make sure they are one tensor
        model.lm_head.weight = model.wte.weight
    return model
